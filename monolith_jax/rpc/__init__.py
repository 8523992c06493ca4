"""gRPC between the processes: the protos (`proto/serving.proto`: the
serving PS, the predictor and the training PS shards; `proto/training_step.proto`:
the shards' data plane), their generated code, one place that makes
channels and servers (`wire`), and flat messages without protobuf objects
(`flat`)."""
