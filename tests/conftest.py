import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def smollm2_ready() -> bool:
    from layerscope.data import assets

    return assets.is_ready("smollm2")


requires_smollm2 = pytest.mark.skipif(not smollm2_ready(), reason="run `layerscope assets fetch` first")


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP synchronisation costs far more
    than the arithmetic. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
