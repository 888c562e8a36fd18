"""``xlpipe <stage> [args]``: one console script over the ``python -m pipeline.<stage>`` entries."""
from __future__ import annotations

import importlib
import sys

# command -> module whose main(argv) runs it
STAGES = {
    "prepare": "pipeline.prepare",
    "train": "pipeline.train",
    "compare": "pipeline.compare",
    "evaluate": "pipeline.evaluate",
    "export": "pipeline.export",
    "generate": "pipeline.generate",
    "import-reference": "pipeline.import_reference",
}
# stages that may have run a gloo/NCCL process group: leave as `python -m` does for them,
# without interpreter teardown (see pipeline.runtime.stage.exit_now)
DISTRIBUTED = ("train", "evaluate")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        names = ", ".join(STAGES)
        print(f"usage: xlpipe <stage> [args]\nstages: {names}", file=sys.stderr if argv else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(STAGES[argv[0]])
    code = module.main(argv[1:]) or 0
    if argv[0] in DISTRIBUTED:
        from pipeline.runtime.stage import exit_now

        exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
