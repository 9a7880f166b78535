"""Run ``gloro-fast train`` and report every training step on stdout, then wait at one chosen
step (``--stop-at EPOCH STEP``) to be killed by tests/test_resume.py: a real SIGKILL by PID,
at a known point in the middle of an epoch."""
import sys
import time

import gloro_fast.train as train_module
from gloro_fast import cli


class _Reporting:
    """A DataLoader that prints ``STEP epoch step`` before each batch."""

    epoch = 0

    def __init__(self, loader, stop):
        self.loader, self.stop = loader, stop

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        _Reporting.epoch += 1
        for step, batch in enumerate(self.loader):
            print(f"STEP {_Reporting.epoch} {step}", flush=True)
            if (_Reporting.epoch, step) == self.stop:
                time.sleep(120)  # the parent kills us here
            yield batch


def main():
    argv = sys.argv[1:]
    at = argv.index("--stop-at")
    stop = (int(argv[at + 1]), int(argv[at + 2]))
    argv = argv[:at] + argv[at + 3:]
    make_loaders = train_module.make_loaders

    def reporting_loaders(*args, **kwargs):
        train_loader, test_loader = make_loaders(*args, **kwargs)
        return _Reporting(train_loader, stop), test_loader

    train_module.make_loaders = reporting_loaders
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
