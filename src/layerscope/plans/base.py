"""Plans are requests: what an action will do, as a small pydantic object written and read as YAML/JSON.

Like a mergekit config, a plan can be made by layerscope (`plan_prune`, `plan_quantize`, ...; the
verbs' `--dry-run` prints it), edited by hand, and handed back (`--plan FILE`). Every artefact
records the plan that made it. Unknown fields are refused, so a typo never passes silently.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from layerscope.errors import LayerscopeError

P = TypeVar("P", bound="Plan")


class Plan(BaseModel):
    """Base of every plan: `kind` names the action it is for."""

    model_config = ConfigDict(extra="forbid")
    kind: ClassVar[str] = "plan"

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.kind, **self.model_dump(mode="json")}

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=110)

    def to_json_text(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the plan (YAML for .yaml/.yml, else JSON), atomically."""
        from layerscope.outputs import write_text_atomic

        path = Path(path)
        text = self.to_yaml() if path.suffix.lower() in (".yaml", ".yml") else self.to_json_text()
        return write_text_atomic(path, text)

    @classmethod
    def from_dict(cls: type[P], data: Any, where: str = "plan") -> P:
        if not isinstance(data, dict):
            raise LayerscopeError(f"{where} is not a {cls.kind} plan (expected a mapping)")
        data = dict(data)
        kind = data.pop("plan", cls.kind)
        if kind != cls.kind:
            raise LayerscopeError(f"{where} is a '{kind}' plan, not a '{cls.kind}' plan")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(x) for x in err.get("loc", ())) or "plan"
            raise LayerscopeError(f"{where}: field '{field}': {err.get('msg', 'invalid')}") from None

    @classmethod
    def from_file(cls: type[P], path: str | Path) -> P:
        """Read a plan written by `save` or by hand (YAML or JSON)."""
        import yaml

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LayerscopeError(f"plan file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LayerscopeError(f"cannot read plan file {path}: {exc}") from None
        try:
            data = yaml.safe_load(text)  # JSON is YAML too
        except yaml.YAMLError as exc:
            raise LayerscopeError(f"{path} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from None
        return cls.from_dict(data, where=str(path))
