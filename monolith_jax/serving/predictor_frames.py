"""The predictor's Predict and Info over frames (`monolith_jax.rpc.frames`).

    monolith predictor --model DIR --tables local --frames-port P
    client = PredictorClient("frames://127.0.0.1:P")

The same PredictRequest / PredictReply and InfoRequest / InfoReply
messages as the gRPC service, the same checks and the same errors
(INVALID_ARGUMENT naming what was wrong, UNAVAILABLE when a serving PS
lookup fails), on a transport that costs a round trip of TCP rather than
gRPC's ~0.5 ms a call: for a one-hop predictor answering a batch of 1,
the transport is most of the time a request takes. The gRPC port goes on
serving beside it (the trainers' pushes and every other client); frames
carry only these two calls.
"""

from __future__ import annotations

from monolith_jax.rpc import frames, wire

PREDICT, INFO = 1, 2


def handlers(predictor) -> dict:
    """Method number -> handler(bytes) -> bytes, for a FramesServer."""
    import grpc
    from google.protobuf.message import DecodeError

    from monolith_jax.rpc import serving_pb2 as pb
    from monolith_jax.serving.predictor import info_reply, predict_reply

    def predict(payload: bytes) -> bytes:
        request = pb.PredictRequest()
        try:
            request.ParseFromString(payload)
        except DecodeError as err:
            with predictor._lock:
                predictor.stats["bad_requests"] += 1
            raise wire.RequestError(f"not a PredictRequest ({len(payload)} bytes): {err}") from None
        try:
            return predict_reply(predictor, request).SerializeToString()
        except grpc.RpcError as err:   # the serving PS, two hops away
            raise frames.Unavailable(f"serving PS lookup: {err.code().name}") from None

    def info(payload: bytes) -> bytes:
        return info_reply(predictor).SerializeToString()

    return {PREDICT: predict, INFO: info}


def start(predictor, host: str, port: int, security=None) -> frames.FramesServer:
    return frames.FramesServer(handlers(predictor), host, port, security, name="predictor-frames")


class Stub:
    """PredictorStub's Predict and Info over a FramesChannel; a call that
    fails raises frames.CallError (with `.code` and `.code_name`, as
    gRPC's codes)."""

    def __init__(self, address: str, security=None):
        self.channel = frames.FramesChannel(address, security)

    def Predict(self, request, timeout: float):
        from monolith_jax.rpc import serving_pb2 as pb

        reply = pb.PredictReply()
        reply.ParseFromString(self.channel.call(PREDICT, request.SerializeToString(), timeout))
        return reply

    def Info(self, request, timeout: float):
        from monolith_jax.rpc import serving_pb2 as pb

        reply = pb.InfoReply()
        reply.ParseFromString(self.channel.call(INFO, request.SerializeToString(), timeout))
        return reply

    def close(self) -> None:
        self.channel.close()
