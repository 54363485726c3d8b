"""gRPC front end (grpc.aio): thin servicers over `Service`."""
