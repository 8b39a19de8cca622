import pytest


@pytest.fixture(autouse=True)
def no_process_group_left():
    """Some tests run a CLI's main() in this process: it sets up a world of one and tears it down at the end (or
    stops on bad input before that). Afterwards neither a process group nor fairscale model-parallel groups of a
    destroyed world may survive, or a later test's common.parallel.setup() reuses groups that no longer exist."""
    yield
    import sys
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    fs = sys.modules.get("fairscale.nn.model_parallel.initialize")
    if fs is not None and fs.model_parallel_is_initialized():
        fs.destroy_model_parallel()
