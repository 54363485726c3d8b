"""Generated gRPC modules of the adapterd.v1 API.

Sources: protos/adapterd/v1/*.proto; regenerate with `bash scripts/gen_protos.sh`.
"""
