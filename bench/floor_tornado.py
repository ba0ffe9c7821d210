"""The HTTP floor: a bare Tornado handler that answers ``{}``."""

from __future__ import annotations

import asyncio
import sys

import tornado.web


class Empty(tornado.web.RequestHandler):
    def post(self) -> None:
        self.write(b"{}")

    get = post


async def main(port: int) -> None:
    tornado.web.Application([(r"/.*", Empty)], log_function=lambda handler: None).listen(port, "127.0.0.1")
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
