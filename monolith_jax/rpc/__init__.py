"""gRPC between the processes: one proto (`proto/serving.proto`: the
serving PS, the predictor and the training PS shards), its generated code,
and one place that makes channels and servers (`wire`)."""
