"""The preemption handler: a signal sets a flag that the loop polls (no work happens in the handler),
and a run that cannot save within the grace period is ended with exit code 143."""
import os
import signal
import subprocess
import sys
import time

from engine.preemption import Preemption

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_each_signal_sets_the_flag_and_the_handlers_are_restored():
    previous = signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        stopper = Preemption(grace_period_s=0).install()
        assert not stopper.should_stop()
        os.kill(os.getpid(), sig)
        deadline = time.monotonic() + 5
        while not stopper.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stopper.should_stop() and stopper.signal_name == signal.Signals(sig).name
        stopper.uninstall()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_grace_period_ends_a_process_that_does_not_finish():
    code = ("import os, signal, sys, time; sys.path.insert(0, %r)\n"
            "from engine.preemption import Preemption\n"
            "p = Preemption(grace_period_s=0.5).install()\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n") % ROOT
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    rc = proc.wait(timeout=30)
    assert rc == 143 and time.monotonic() - start < 20
    assert "grace period of 0.5 s after SIGUSR1 ran out" in proc.stderr.read()
