"""HTTP front end (Starlette): thin routes over `Service`."""
