"""StopOnSignal: the first SIGINT/SIGTERM asks for a stop, a second one interrupts at once, and the same request
delivered twice (as `timeout` does: its command, then the command's process group) is one request."""
import signal
import threading
import time

import pytest

from prunekit.core.interrupts import REPEAT_WINDOW_S, StopOnSignal, Terminated, handled


@pytest.mark.parametrize("signum, error", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)])
def test_one_request_delivered_twice_is_one_request_and_a_later_signal_interrupts(signum, error):
    stops = []
    # to the main thread itself: os.kill(getpid()) lets the kernel pick any thread, and on a loaded machine with
    # torch's worker threads about, the C handler can run late (CI once saw the third signal land after the check)
    main = threading.main_thread().ident
    reached = []

    def previous(signum, frame):   # what was there before: known here, whatever earlier tests left in this process
        reached.append(signum)
        raise error()
    with handled(previous, signals=(signum,)):
        with StopOnSignal(on_stop=lambda: stops.append(1)) as stop:
            signal.pthread_kill(main, signum)   # the handler runs as soon as this returns: before the second delivery
            signal.pthread_kill(main, signum)
            assert stop.signum == signum and stops == [1] and not reached
            while time.monotonic() - stop._first_at < REPEAT_WINDOW_S * 1.5:   # past the window, however loaded
                time.sleep(0.05)
            with pytest.raises(error):
                signal.pthread_kill(main, signum)
                for _ in range(100):   # not reached: the handler raises at the next bytecode
                    time.sleep(0.1)
        assert reached == [signum] and signal.getsignal(signum) is previous   # the previous handler is back


def test_the_handlers_before_are_restored_when_no_signal_came():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopOnSignal() as stop:
        assert signal.getsignal(signal.SIGINT) == stop._handle
    assert {s: signal.getsignal(s) for s in before} == before and stop.signum is None
