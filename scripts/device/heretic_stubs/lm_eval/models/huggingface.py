"""Import-only stand-in for lm_eval.models.huggingface: benchmark only, never used in a run.

heretic imports the name HFLM at module top; building one (what heretic does only when asked to
benchmark an exported model) raises.
"""


class HFLM:
    """Not lm-eval's model wrapper: creating one raises."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            "lm_eval.models.huggingface.HFLM: this is the benchmark's import-only stand-in "
            "(scripts/device/heretic_stubs); lm-eval is not part of the benchmark"
        )
