"""StopOnSignal: the first SIGINT/SIGTERM asks for a stop, a second one interrupts at once, and the same request
delivered twice (as `timeout` does: its command, then the command's process group) is one request."""
import os
import signal
import time

import pytest

from prunekit.core.interrupts import REPEAT_WINDOW_S, StopOnSignal, Terminated


@pytest.mark.parametrize("signum, error", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_one_request_delivered_twice_is_one_request_and_a_later_signal_interrupts(signum, error):
    stops = []
    with StopOnSignal(on_stop=lambda: stops.append(1)) as stop:
        os.kill(os.getpid(), signum)   # the handler runs as soon as os.kill returns: before the second delivery
        os.kill(os.getpid(), signum)
        assert stop.signum == signum and stops == [1]
        time.sleep(REPEAT_WINDOW_S * 1.5)
        with pytest.raises(error):
            os.kill(os.getpid(), signum)
            time.sleep(1)   # not reached: the handler raises at the next bytecode
    assert signal.getsignal(signum) is not stop._handle   # the previous handler is back


def test_the_handlers_before_are_restored_when_no_signal_came():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopOnSignal() as stop:
        assert signal.getsignal(signal.SIGINT) == stop._handle
    assert {s: signal.getsignal(s) for s in before} == before and stop.signum is None
