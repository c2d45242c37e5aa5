"""graceful-http's benchmark: graceful-http beside plain uvicorn and gunicorn (see README, "Benchmark")."""
