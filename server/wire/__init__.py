"""What the front ends (and the trainer's) share on the wire: JSON body fields, structured-output options,
error bodies, server-sent events, the gRPC call wrapper and server."""
