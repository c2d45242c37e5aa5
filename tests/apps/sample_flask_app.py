"""A real Flask app (WSGI), for tests of WSGI apps across reloads.

Works with Debian 12's python3-flask (2.2) and the newest Flask. Tests
rewrite GREETING before a reload to see the new code serve.
"""

import os
import time

from flask import Flask

GREETING = "flask says hello"

app = Flask(__name__)


@app.route("/")
def home():
    return f"{GREETING} pid:{os.getpid()}\n", 200, {"Content-Type": "text/plain; charset=utf-8"}


@app.route("/sleep")
def sleep():
    from flask import request

    seconds = float(request.args.get("seconds", "1"))
    time.sleep(seconds)  # a blocking handler, as WSGI apps have them
    return f"{GREETING} slept {seconds:g}s pid:{os.getpid()}\n"


@app.route("/echo", methods=["POST"])
def echo():
    from flask import request

    return request.get_data(), 200, {"Content-Type": "application/octet-stream"}
