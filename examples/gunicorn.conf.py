"""gunicorn settings for ``wsgi_app``: start the cachebus subscriber in each worker, after the fork.

``post_fork`` runs in the new worker process, so every worker joins the bus on
its own, with its own sockets and its own id, and the service expects (and
lists) each one. A subscriber started in the master, or at import time with
``--preload``, would be one subscriber whose sockets every child inherits.
The app module is imported inside the hooks, so the master never imports it
unless ``--preload`` asks for that.
"""


def post_fork(server, worker):
    from wsgi_app import start_subscriber

    start_subscriber()


def worker_exit(server, worker):
    from wsgi_app import stop_subscriber

    stop_subscriber()
