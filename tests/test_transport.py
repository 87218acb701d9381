"""The datagram transport: delivery, order and isolation per destination, access."""

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from serveflow.runtime.transport import MAX_DATAGRAM, Endpoint, PeerGone

# More than any net.unix.max_dgram_qlen in use (often 10): the receiver's queue fills.
FLOOD = 200


@pytest.fixture
def rundir():
    path = tempfile.mkdtemp(prefix="serveflow-test-transport-")  # mode 0700
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def endpoints(rundir):
    made = []

    def make(name):
        endpoint = Endpoint(os.path.join(rundir, name))
        made.append(endpoint)
        return endpoint

    yield make
    for endpoint in made:
        endpoint.close()


def receive(endpoint, count, timeout=5.0):
    got, deadline = [], time.monotonic() + timeout
    while len(got) < count:
        data = endpoint.recv(max(0.0, deadline - time.monotonic()))
        if data is None:
            break
        got.append(data)
    return got


def test_round_trip(endpoints):
    a, b = endpoints("a"), endpoints("b")
    a.send(b.path, b"hello")
    assert b.recv(2) == b"hello"
    b.send(a.path, b"x" * MAX_DATAGRAM)
    assert a.recv(2) == b"x" * MAX_DATAGRAM
    a.send(a.path, b"to myself")
    assert a.recv(2) == b"to myself"
    assert b.recv(0) is None
    with pytest.raises(ValueError):
        a.send(b.path, b"x" * (MAX_DATAGRAM + 1))


def test_a_wait_under_a_millisecond_lasts_its_length_not_a_whole_one(endpoints):
    # A worker waits this way for a partial batch's timeout: poll(2) counts whole
    # milliseconds, and a batch's timeout of 0.72 ms waited 1.4 ms.
    a, b = endpoints("a"), endpoints("b")
    waits = []
    for _ in range(20):
        began = time.monotonic()
        assert a.recv(0.0003) is None
        waits.append(time.monotonic() - began)
    assert min(waits) >= 0.0003
    assert min(waits) < 0.0009, waits
    b.send(a.path, b"now")  # one that comes during a wait ends it
    assert a.recv(0.0005) == b"now"


def test_order_per_destination_under_a_full_queue(endpoints):
    sender, receiver = endpoints("sender"), endpoints("receiver")
    messages = [f"m{i}".encode() for i in range(FLOOD)]
    for m in messages:
        sender.send(receiver.path, m)
    assert sender.backlog(receiver.path) > 0  # the queue did fill: the test means something
    assert receive(receiver, FLOOD) == messages
    assert receiver.recv(0.05) is None
    assert sender.backlog(receiver.path) == 0
    # Once the backlog is gone, sends go straight out again, still in order.
    sender.send(receiver.path, b"after")
    assert receiver.recv(2) == b"after"


def test_a_backlog_reaches_its_receiver_bundled_in_few_datagrams(endpoints):
    sender, receiver = endpoints("sender"), endpoints("receiver")
    messages = [f"m{i}".encode() * (i % 7 + 1) for i in range(FLOOD)]
    messages.append(b"y" * (MAX_DATAGRAM // 2))  # too large to share a bundle
    messages.append(b"last")
    for m in messages:
        sender.send(receiver.path, m)
    assert receive(receiver, len(messages)) == messages
    # the receiver's queue (10 datagrams here) took the first ones as they came; the
    # backlog behind them came in a few bundles, not one datagram each
    assert receiver.datagrams < FLOOD // 4
    with pytest.raises(ValueError, match="zero byte"):
        sender.send(receiver.path, b"\x00not a bundle of ours")


def test_messages_sent_together_arrive_in_order_in_few_datagrams(endpoints):
    sender, receiver = endpoints("sender"), endpoints("receiver")
    sender.send(receiver.path, b"first")  # connects: later sends take the direct path
    assert receive(receiver, 1) == [b"first"]
    messages = [f"r{i}".encode() * (i % 5 + 1) for i in range(FLOOD)]
    messages.insert(FLOOD // 2, b"z" * (MAX_DATAGRAM // 2))  # too large to share
    # more than the receiver's queue holds in bundles: the rest waits in the backlog
    many = [f"b{i}".encode() * 400 for i in range(4 * FLOOD)]
    sender.send_all(receiver.path, messages)
    sender.send_all(receiver.path, many)
    sender.send(receiver.path, b"last")
    assert receive(receiver, len(messages) + len(many) + 1) == [*messages, *many, b"last"]
    assert receiver.datagrams < 1 + (len(messages) + len(many)) // 10
    # a call's results (small messages) go out as one datagram
    results = [f"result {i}".encode() for i in range(FLOOD // 4)]
    before = receiver.datagrams
    sender.send_all(receiver.path, results)
    assert receive(receiver, len(results)) == results
    assert receiver.datagrams == before + 1
    with pytest.raises(ValueError, match="zero byte"):
        sender.send_all(receiver.path, [b"fine", b"\x00not a bundle of ours"])


def test_messages_sent_together_off_the_direct_path_go_out_bundled(endpoints):
    # the first send to a destination connects (and so does the first after a backlog
    # drained, until the drainer hands the socket back): a call's results still go as one
    sender, receiver = endpoints("sender"), endpoints("receiver")
    results = [f"result {i}".encode() for i in range(FLOOD // 4)]
    sender.send_all(receiver.path, results)
    assert receive(receiver, len(results)) == results
    assert receiver.datagrams == 1


def test_a_malformed_bundle_is_dropped_and_what_follows_is_read(endpoints):
    receiver = endpoints("receiver")
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        raw.sendto(b"\x00\x02\x00\x00\x00ok\xff\xff\xff\x7fshort", receiver.path)
        raw.sendto(b"next", receiver.path)
    finally:
        raw.close()
    assert receive(receiver, 2) == [b"ok", b"next"]


def test_order_per_destination_while_the_receiver_makes_room(endpoints):
    """Room appearing while a backlog waits must not let later messages overtake it."""
    sender, receiver = endpoints("sender"), endpoints("receiver")
    messages = [f"m{i}".encode() for i in range(10 * FLOOD)]
    got = []
    for i, m in enumerate(messages):
        sender.send(receiver.path, m)
        if i % 20 == 19:
            got += receive(receiver, 15)
    got += receive(receiver, len(messages) - len(got))
    assert got == messages


def test_delivered_waits_for_the_backlog(endpoints):
    """`delivered` returns once a backlog is out (the receiver made room), and says
    False when the receiver stays full past its timeout."""
    sender, receiver = endpoints("sender"), endpoints("receiver")
    for i in range(FLOOD):
        sender.send(receiver.path, f"m{i}".encode())
    assert sender.backlog(receiver.path) > 0
    assert not sender.delivered(receiver.path, 0.05)
    reader = threading.Thread(target=receive, args=(receiver, FLOOD))
    reader.start()
    assert sender.delivered(receiver.path, 5.0)
    assert sender.backlog(receiver.path) == 0
    reader.join()


def test_a_stuck_receiver_does_not_delay_another(endpoints):
    sender, stuck, live = endpoints("sender"), endpoints("stuck"), endpoints("live")
    for i in range(FLOOD):
        sender.send(stuck.path, f"m{i}".encode())
    assert sender.backlog(stuck.path) > 0
    start = time.monotonic()
    sender.send(live.path, b"urgent")
    assert live.recv(2) == b"urgent"
    assert time.monotonic() - start < 1.0  # behind the stuck one: not before it reads
    assert sender.backlog(live.path) == 0
    # The stuck receiver still gets everything, in order, once it reads.
    assert receive(stuck, FLOOD) == [f"m{i}".encode() for i in range(FLOOD)]


def test_a_stuck_receiver_of_large_messages_does_not_delay_another(endpoints):
    """Large messages piling up at one receiver use up no send buffer the others need."""
    sender, stuck, live = endpoints("sender"), endpoints("stuck"), endpoints("live")
    for _ in range(40):
        sender.send(stuck.path, b"x" * MAX_DATAGRAM)
    start = time.monotonic()
    sender.send(live.path, b"urgent")
    assert live.recv(2) == b"urgent"
    assert time.monotonic() - start < 1.0  # behind the stuck one: not before it reads
    assert len(receive(stuck, 40)) == 40


def test_sends_never_block_the_caller(endpoints):
    sender, stuck = endpoints("sender"), endpoints("stuck")
    start = time.monotonic()
    for i in range(FLOOD):
        sender.send(stuck.path, f"m{i}".encode())
    assert time.monotonic() - start < 1.0


def test_peer_gone(endpoints, rundir):
    sender = endpoints("sender")
    with pytest.raises(PeerGone):
        sender.send(os.path.join(rundir, "nobody"), b"hello")
    # A socket file nobody is bound to any more (a process that died without closing).
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(os.path.join(rundir, "dead"))
    dead.close()
    with pytest.raises(PeerGone):
        sender.send(os.path.join(rundir, "dead"), b"hello")


def test_a_destination_that_goes_away(endpoints, rundir):
    sender, receiver = endpoints("sender"), endpoints("receiver")
    sender.send(receiver.path, b"hello")
    assert receiver.recv(2) == b"hello"
    receiver.close()
    with pytest.raises(PeerGone):
        sender.send(receiver.path, b"hello again")
    # Its backlog is dropped when it goes away, and the next send says it is gone.
    again = Endpoint(receiver.path)
    try:
        for i in range(FLOOD):
            sender.send(again.path, f"m{i}".encode())
        assert sender.backlog(again.path) > 0
    finally:
        again.close()
    deadline = time.monotonic() + 5
    while sender.backlog(again.path) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sender.backlog(again.path) == 0
    with pytest.raises(PeerGone):
        sender.send(again.path, b"late")


def test_a_restarted_destination_is_reached(endpoints, rundir):
    sender = endpoints("sender")
    path = os.path.join(rundir, "worker")
    first = Endpoint(path)
    sender.send(path, b"one")
    assert first.recv(2) == b"one"
    first.close()
    second = endpoints("worker")
    sender.send(path, b"two")
    assert second.recv(2) == b"two"


def test_close_removes_the_socket_file(rundir):
    path = os.path.join(rundir, "ep")
    endpoint = Endpoint(path)
    assert os.path.exists(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    endpoint.close()
    assert not os.path.exists(path)
    endpoint.close()  # twice is harmless


def test_a_second_endpoint_cannot_take_a_live_path(endpoints, rundir):
    endpoints("ep")
    with pytest.raises(OSError):
        Endpoint(os.path.join(rundir, "ep"))


# -- access by another user --------------------------------------------------------------
OTHER_USER = "sf-transport-test"
PROBE = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
try:
    s.sendto(b"intruder", sys.argv[1])
except PermissionError:
    print("PermissionError")
except OSError as error:
    print(type(error).__name__, error)
else:
    print("sent")
"""


def run_as(user, *argv):
    if shutil.which("runuser"):
        command = ["runuser", "-u", user, "--", *argv]
    else:
        command = ["su", "-s", "/bin/sh", user, "-c", " ".join(map(repr, argv))]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


@pytest.fixture
def other_user():
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    if not shutil.which("useradd") or not (shutil.which("runuser") or shutil.which("su")):
        pytest.skip("needs useradd and runuser or su")
    try:
        pwd.getpwnam(OTHER_USER)
        created = False
    except KeyError:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", OTHER_USER],
            check=True,
            capture_output=True,
        )
        created = True
    try:
        # This interpreter may sit where the other user cannot go (under /root).
        for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
            if os.path.exists(python) and run_as(OTHER_USER, python, "-c", "pass").returncode == 0:
                break
        else:
            pytest.skip(f"no Python that {OTHER_USER} can run")
        yield OTHER_USER, python
    finally:
        if created:
            subprocess.run(["userdel", OTHER_USER], capture_output=True)


def test_another_user_cannot_send(other_user, rundir):
    user, python = other_user
    endpoint = Endpoint(os.path.join(rundir, "ep"))
    try:
        assert os.stat(rundir).st_mode & 0o777 == 0o700
        result = run_as(user, python, "-c", PROBE, endpoint.path)
        assert result.stdout.strip() == "PermissionError", result
        assert endpoint.recv(0.1) is None

        # The control: with the directory and socket opened up, the same probe gets
        # through. So the refusal above comes from the permissions, not the probe.
        os.chmod(rundir, 0o755)
        os.chmod(endpoint.path, 0o777)
        result = run_as(user, python, "-c", PROBE, endpoint.path)
        assert result.stdout.strip() == "sent", result
        assert endpoint.recv(2) == b"intruder"
    finally:
        endpoint.close()
