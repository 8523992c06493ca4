"""A service told to stop does stop, even with a handler that never returns."""

import os
import signal
import subprocess
import sys
import textwrap
import time

SERVER = textwrap.dedent("""
    import sys, threading
    import grpc
    from monolith_jax.rpc import wire

    stuck = threading.Event()

    def hang(request, context):  # a handler held past any grace (a lock never released, say)
        print("handler entered", flush=True)
        stuck.wait()
        return request

    handler = grpc.method_handlers_generic_handler(
        "test.Stuck", {"Hang": grpc.unary_unary_rpc_method_handler(hang)})
    server, port = wire.start_server(lambda s: s.add_generic_rpc_handlers((handler,)), "127.0.0.1", 0, 2)
    print(f"port {port}", flush=True)
    wire.run_until_signalled(server, grace_s=0.5, exit_after_s=1.0)
""")


def test_a_handler_that_never_returns_does_not_hold_the_process_after_sigterm():
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        port = int(proc.stdout.readline().split()[1])
        import grpc

        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = channel.unary_unary("/test.Stuck/Hang", request_serializer=None, response_deserializer=None)
        future = call.future(b"x", timeout=30)
        assert proc.stdout.readline().strip() == "handler entered"
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        took = time.monotonic() - start
        future.cancel()
        channel.close()
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 1 and took < 20, (code, took)
    assert "in hang" in err and "Timeout" in err, err[-2000:]  # the stacks name the stuck handler


SIGNALLED_ELSEWHERE = textwrap.dedent("""
    import signal, threading, time
    import grpc
    from monolith_jax.rpc import wire

    handler = grpc.method_handlers_generic_handler("test.Idle", {})
    server, port = wire.start_server(lambda s: s.add_generic_rpc_handlers((handler,)), "127.0.0.1", 0, 2)
    other = threading.Thread(target=time.sleep, args=(60,), daemon=True)
    other.start()

    def deliver():  # SIGTERM to a thread that is not the main one, as the kernel may choose
        time.sleep(1.0)
        signal.pthread_kill(other.ident, signal.SIGTERM)

    threading.Thread(target=deliver, daemon=True).start()
    print("serving", flush=True)
    wire.run_until_signalled(server, grace_s=0.5, exit_after_s=30.0)
    print("stopped", flush=True)
""")


def test_sigterm_delivered_to_another_thread_still_stops_the_service():
    proc = subprocess.Popen([sys.executable, "-c", SIGNALLED_ELSEWHERE], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout.readline().strip() == "serving"
        code = proc.wait(20)   # the main thread must notice without being woken by the signal itself
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0 and proc.stdout.read().strip() == "stopped", proc.stderr.read()[-2000:]
