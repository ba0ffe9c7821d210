"""The ``cachebus`` command: one entry point for the service, workers and tokens.

Each subcommand is a small :class:`Command` class. Errors a user can fix (a bad
flag, a bad settings file, a port in use) end the process with one line on
stderr, never a traceback.

Exit statuses:

- ``serve``, ``worker``, ``tokens``, ``keys``, ``demo``: 0 done; 2 an error the
  user can fix (a bad flag or settings file, a port in use, an unknown token).
- ``clear`` and ``workers`` keep 2 and 3 for what ``clear --wait`` found, so
  their own errors exit with 1:

  - 0: accepted; with ``--wait``, every worker process live at publish time
    acked a successful purge (and at least N did, with ``--expect N``), or
    nobody was live and ``--allow-empty`` was given;
  - 1: a usage error, missing credentials, an HTTP error or an unreachable
    service;
  - 2: ``--wait`` found no proof: it timed out, a purge failed (and no
    successful one from that process followed), or fewer than N processes
    acked with ``--expect N``;
  - 3: ``--wait`` found nobody listening: no worker process was live when the
    clear was published (unless ``--allow-empty``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import zmq

from cachebus.bus.scope import check_lists
from cachebus.bus.security import SERVICE_KEY, WORKERS_DIR, KeyFileError, ensure_keypair, key_name, private_dir

from . import client, logs
from . import settings as settings_mod
from .settings import Settings, SettingsError


class UsageError(Exception):
    """Something the user can fix; printed as one line, exit status 2 (1 for the client commands)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


class _Parser(argparse.ArgumentParser):
    #: The exit status of this parser's usage errors: its command's.
    usage_status = 2

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}", self.usage_status)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        # argparse reports a subcommand's unknown flags from the top parser; give them the subcommand's status.
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            status = getattr(getattr(parsed, "command", None), "usage_status", self.usage_status)
            raise UsageError(f"{self.prog}: unrecognized arguments: {' '.join(extras)}", status)
        return parsed


class Command:
    """One subcommand: its flags, and what it does with them."""

    name = ""
    help = ""
    #: Flags that override a setting: (flag, dotted setting key, type).
    setting_flags: tuple[tuple[str, str, type], ...] = ()
    #: Exit status of a usage error.
    usage_status = 2

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        for flag, key, kind in self.setting_flags:
            parser.add_argument(flag, type=kind, metavar=key.rsplit(".", 1)[-1].upper(),
                                help=f"overrides the setting {key}")

    def settings(self, args: argparse.Namespace) -> Settings:
        loaded = settings_mod.load(args.config)
        for flag, key, _ in self.setting_flags:
            value = getattr(args, flag.lstrip("-").replace("-", "_"))
            if value is not None:
                loaded = loaded.replace({key: value}, source=f"command line {flag}")
        return loaded

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError


_BUS_FLAGS = (("--bus-publish", "bus.publish", str), ("--bus-acks", "bus.acks", str),
              ("--keys-dir", "bus.keys_dir", str), ("--log-format", "log.format", str))


def _setup_logging(settings: Settings) -> None:
    logs.setup(settings)


def _run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run ``main(stop)`` on a fresh event loop; SIGINT or SIGTERM sets ``stop``."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        asyncio.run(runner())
    except KeyFileError as exc:
        raise UsageError(f"bus key: {exc}") from None
    except SettingsError as exc:
        raise UsageError(str(exc)) from None
    except zmq.ZMQError as exc:
        raise UsageError(f"cannot use bus endpoint: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot listen: {exc.strerror or exc}") from None
    return 0


class Serve(Command):
    name = "serve"
    help = "start the HTTP service and the bus"
    setting_flags = (("--port", "service.port", int), ("--tokens-dir", "service.tokens_dir", str),
                     *_BUS_FLAGS)

    def run(self, args: argparse.Namespace) -> int:
        from cachebus.service.app import serve

        settings = self.settings(args)
        _setup_logging(settings)
        return _run_until_signalled(lambda stop: serve(settings, stop))


class Worker(Command):
    name = "worker"
    help = "start a reference worker (a cached content API)"
    setting_flags = (("--http-port", "worker.http_port", int), ("--content-dir", "worker.content_dir", str),
                     ("--name", "worker.name", str), *_BUS_FLAGS)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--purge-dir", action="append", metavar="PATH",
                            help="empty this directory of cache files on every clear, keeping the directory, as "
                                 "Flextype's clear empties its var/tmp; repeatable; replaces the setting "
                                 "worker.purge_dirs")
        parser.add_argument("--label", action="append", metavar="LABEL",
                            help="another name this worker answers to in a clear's group (a region, a colour, a "
                                 "host); repeatable; replaces the setting worker.labels")

    def settings(self, args: argparse.Namespace) -> Settings:
        loaded = super().settings(args)
        if args.purge_dir:
            loaded = loaded.replace({"worker.purge_dirs": args.purge_dir}, source="command line --purge-dir")
        if args.label:
            loaded = loaded.replace({"worker.labels": args.label}, source="command line --label")
        return loaded

    def check_purge_dirs(self, args: argparse.Namespace, settings: Settings) -> None:
        """Refuse a purge directory before anything starts, naming where it was given and the key."""
        from cachebus.workers.worker import purge_dirs

        try:
            purge_dirs(settings)
        except SettingsError as exc:
            source = ("command line --purge-dir" if args.purge_dir else
                      str(args.config or os.environ.get(settings_mod.CONFIG_ENV) or settings_mod.DEFAULT_CONFIG_PATH))
            raise UsageError(f"{source}: {exc}") from None

    def run(self, args: argparse.Namespace) -> int:
        from cachebus.workers.worker import run

        settings = self.settings(args)
        if not Path(settings.worker.content_dir).is_dir():
            raise UsageError(f"worker.content_dir: {settings.worker.content_dir} is not a directory")
        self.check_purge_dirs(args, settings)
        _setup_logging(settings)
        return _run_until_signalled(lambda stop: run(settings, stop))


class RelayCommand(Command):
    name = "relay"
    help = "start a relay: one per host, between the service and the workers on it (docs/scale-out.md)"
    setting_flags = (("--name", "relay.name", str), ("--publish", "relay.publish", str),
                     ("--acks", "relay.acks", str), ("--relay-keys-dir", "relay.keys_dir", str),
                     ("--http-port", "relay.http_port", int), *_BUS_FLAGS)

    def run(self, args: argparse.Namespace) -> int:
        from cachebus.relay.relay import serve

        settings = self.settings(args)
        _setup_logging(settings)
        return _run_until_signalled(lambda stop: serve(settings, stop))


class TokensCreate(Command):
    name = "create"
    help = "create a token; the access token is shown once and stored only as a bcrypt hash"
    setting_flags = (("--tokens-dir", "service.tokens_dir", str),)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--limit-calls", type=int, default=0, metavar="N",
                            help="calls allowed before the token stops working (0: unlimited)")
        parser.add_argument("--json", action="store_true", help="print one JSON object")

    def run(self, args: argparse.Namespace) -> int:
        from cachebus.service.auth.admin import create_token

        if args.limit_calls < 0:
            raise UsageError("--limit-calls: expected a count >= 0")
        created = create_token(self.settings(args).service.tokens_dir, limit_calls=args.limit_calls)
        if args.json:
            print(json.dumps({"token": created.token, "access_token": created.access_token,
                              "path": str(created.path)}))
        else:
            print(f"token:        {created.token}\naccess_token: {created.access_token}\n"
                  f"written to:   {created.path}\n"
                  "The access token is not stored anywhere: keep it now.")
        return 0


class TokensList(Command):
    name = "list"
    help = "list tokens with their state and call counts"
    setting_flags = (("--tokens-dir", "service.tokens_dir", str),)

    def run(self, args: argparse.Namespace) -> int:
        from cachebus.service.auth.admin import list_tokens

        rows = list_tokens(self.settings(args).service.tokens_dir)
        print(f"{'TOKEN':34} {'STATE':9} {'CALLS':>7} {'LIMIT':>7}  CREATED BY")
        for t in rows:
            print(f"{t.token:34} {t.state:9} {t.calls:>7} {t.limit_calls or '-':>7}  {t.created_by}")
        return 0


class TokensDisable(Command):
    name = "disable"
    help = "disable a token; Flextype then answers its calls with 400"
    setting_flags = (("--tokens-dir", "service.tokens_dir", str),)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("token")

    def run(self, args: argparse.Namespace) -> int:
        from cachebus.service.auth.admin import disable_token

        try:
            disable_token(self.settings(args).service.tokens_dir, args.token)
        except KeyError:
            raise UsageError("no such token") from None
        print("disabled")
        return 0


class KeysCreate(Command):
    name = "create"
    help = "create a CURVE keypair for a worker on another host, and say where its files go"
    setting_flags = (("--keys-dir", "bus.keys_dir", str),)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("name", help="the worker's name (worker.name); names its key files")

    def run(self, args: argparse.Namespace) -> int:
        keys = Path(self.settings(args).bus.keys_dir)
        name = key_name(args.name)
        directory = keys / WORKERS_DIR
        if (directory / f"{name}.key_secret").exists():
            raise UsageError(f"{directory / name}.key_secret already exists: a key is never replaced")
        try:
            private_dir(keys)
            keypair, _ = ensure_keypair(directory, name)
        except (KeyFileError, OSError) as exc:
            raise UsageError(f"cannot create the keypair in {directory}: {exc}") from None
        print(f"secret key: {keypair.path}\n"
              f"public key: {keypair.public_file}\n"
              f"For the worker named {args.name}: `cachebus worker --name {args.name}` finds this keypair (or set\n"
              "bus.secret_key_file to the secret key). The secret key never leaves this host. If the service\n"
              "runs on another host:\n"
              f"  - copy {keypair.public_file.name} into <the service's bus.keys_dir>/{WORKERS_DIR}/ there: the\n"
              "    service allows the key at once;\n"
              f"  - copy <the service's bus.keys_dir>/{SERVICE_KEY}.key from there to {keys / SERVICE_KEY}.key here.")
        return 0


class Demo(Command):
    name = "demo"
    help = "prepare the demo (`make run`): a token, demo content, and what to try"
    setting_flags = (("--tokens-dir", "service.tokens_dir", str),
                     ("--content-dir", "worker.content_dir", str))
    credentials_file = Path("var/demo-credentials.json")

    def run(self, args: argparse.Namespace) -> int:
        from cachebus.service.auth.admin import create_token, list_tokens
        from cachebus.workers.content import copy_tree, demo_content

        settings = self.settings(args)
        content = Path(settings.worker.content_dir)
        if not content.exists():
            copy_tree(demo_content(), content)
        creds = None
        if not list_tokens(settings.service.tokens_dir):
            created = create_token(settings.service.tokens_dir, created_by="cachebus demo")
            creds = {"token": created.token, "access_token": created.access_token}
            # A local convenience so every `make run` can print a working command;
            # never done for tokens made with `cachebus tokens create`.
            self.credentials_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.credentials_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(creds, f)
        elif self.credentials_file.exists():
            creds = json.loads(self.credentials_file.read_text())
        print(self.banner(settings, content, creds))
        return 0

    @staticmethod
    def banner(settings: Settings, content: Path, creds: dict[str, str] | None) -> str:
        api = f"http://{settings.service.host}:{settings.service.port}"
        token = creds["token"] if creds else "$TOKEN"
        access = creds["access_token"] if creds else "$ACCESS_TOKEN"
        lines = [
            "",
            "cachebus: starting the service and two workers. Then try:",
            "",
            "  # read an entry from each worker (first a MISS, then a HIT)",
            "  curl -i http://127.0.0.1:8081/entries/hello",
            "  curl -i http://127.0.0.1:8082/entries/hello",
            "",
            f"  # edit {content / 'hello' / 'entry.yaml'}, then clear every worker's cache",
            f"  curl -i -X POST {api}/api/v1/cache/clear -d token={token} -d access_token={access}",
            "  # or only that entry, and wait for every worker's proof (docs/scoped-clears.md)",
            f"  curl -X POST {api}/api/v1/cache/clear -d token={token} -d access_token={access} "
            "-d keys=hello -d wait=all",
            "",
            "  # see which worker acked which clear",
            f"  curl '{api}/api/v1/cache/clears?token={token}&access_token={access}'",
            f"  curl '{api}/api/v1/cache/workers?token={token}&access_token={access}'",
            "",
            "  # watch workers and clears live (the page asks for the token and access token above)",
            f"  open {api}/dashboard",
            f"  curl -N '{api}/api/v1/cache/events?token={token}&access_token={access}'",
            f"  curl {api}/metrics",
            "",
        ]
        if creds is None:
            lines.append("  (set TOKEN and ACCESS_TOKEN, or run: .venv/bin/cachebus tokens create)")
        lines.append("Press Ctrl-C to stop everything.")
        return "\n".join(lines)


#: Modules of the ``service`` extra, which ``serve``, ``worker`` and ``tokens`` import when they run.
SERVICE_MODULES = frozenset({"tornado", "bcrypt", "prometheus_client"})

TOKEN_ENV = "CACHEBUS_TOKEN"
ACCESS_TOKEN_ENV = "CACHEBUS_ACCESS_TOKEN"


class ClientCommand(Command):
    """A command that talks to a running service over HTTP, with a token and access token."""

    usage_status = 1

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--url", help="the service, like http://127.0.0.1:8080 "
                                          "(default: service.host and service.port from the settings)")
        parser.add_argument("--token", help=f"default: ${TOKEN_ENV}")
        parser.add_argument("--access-token", metavar="ACCESS_TOKEN", help=f"default: ${ACCESS_TOKEN_ENV}")

    def api(self, args: argparse.Namespace) -> client.Api:
        token = args.token or os.environ.get(TOKEN_ENV, "")
        access_token = args.access_token or os.environ.get(ACCESS_TOKEN_ENV, "")
        absent = [flag for flag, value in ((f"--token (or ${TOKEN_ENV})", token),
                                           (f"--access-token (or ${ACCESS_TOKEN_ENV})", access_token)) if not value]
        if absent:
            raise UsageError(f"missing credentials: {', '.join(absent)}", 1)
        url = args.url or self.default_url(args)
        try:
            return client.Api(url, token, access_token)
        except ValueError as exc:
            raise UsageError(f"--url: {exc}", 1) from None

    def default_url(self, args: argparse.Namespace) -> str:
        try:
            service = self.settings(args).service
        except SettingsError as exc:
            raise UsageError(str(exc), 1) from None
        host = service.host if service.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        return f"http://{f'[{host}]' if ':' in host else host}:{service.port}"


#: ``cachebus clear``'s scope flags, and the API's list each fills (docs/scoped-clears.md).
_SCOPE_FLAGS = (("key", "keys"), ("prefix", "prefixes"), ("tag", "tags"), ("group", "group"))


class Clear(ClientCommand):
    name = "clear"
    help = ("clear every worker's cache through the service (or only some keys, prefixes or tags, in some "
            "processes); with --wait, until every worker process expected acked a successful purge")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        narrows = "; repeatable (a cache that cannot drop just that drops everything)"
        for flag, what in (("key", "drop only this exact key" + narrows),
                           ("prefix", "drop only the keys starting with this" + narrows),
                           ("tag", "drop only the entries stored with this tag" + narrows),
                           ("group", "only the worker processes with this name or label purge, and only they "
                                     "are expected; repeatable")):
            parser.add_argument(f"--{flag}", action="append", default=[], metavar=flag.upper(), help=what)
        parser.add_argument("--wait", action="store_true",
                            help="follow the clear on the service's event stream until every worker process "
                                 "live at publish time acked a successful purge (exit 0); exit 2 on timeout or "
                                 "a failed purge, 3 when no worker process was live")
        parser.add_argument("--timeout", type=float, metavar="S",
                            help="seconds --wait waits (default: the setting api.cache.wait_timeout, as the "
                                 "service's own wait=all)")
        parser.add_argument("--expect", type=int, metavar="N",
                            help="with --wait: exit 2 unless at least N worker processes acked a successful "
                                 "purge (a deploy knows how many it started)")
        parser.add_argument("--allow-empty", action="store_true",
                            help="with --wait: exit 0, not 3, when no worker process was live to purge")

    def run(self, args: argparse.Namespace) -> int:
        for flag, given in (("--timeout", args.timeout is not None), ("--expect", args.expect is not None),
                            ("--allow-empty", args.allow_empty)):
            if given and not args.wait:
                raise UsageError(f"{flag}: only with --wait", 1)
        if args.timeout is not None and not args.timeout > 0:
            raise UsageError("--timeout: expected a positive number of seconds", 1)
        if args.expect is not None and args.expect < 1:
            raise UsageError("--expect: expected a whole number of processes >= 1", 1)
        if args.expect is not None and args.allow_empty:
            raise UsageError("--expect and --allow-empty exclude each other: one asks for acks, the other "
                             "accepts none", 1)
        try:
            scope = check_lists({field: getattr(args, flag) for flag, field in _SCOPE_FLAGS})
        except ValueError as exc:
            raise UsageError(str(exc), 1) from None
        api = self.api(args)
        try:
            if not args.wait:
                clear_id = api.clear(scope)
                print(f"clear {clear_id} accepted" if clear_id else
                      "clear accepted (the service sent no Cache-Clear-Id header)")
                return 0
            timeout = args.timeout if args.timeout is not None else self.wait_timeout(args)
            # Opened before the clear is published, so not one of its events can be missed;
            # the stream's first event (the snapshot) says the service is sending, and its
            # worker list names the processes that the clear's events give by id.
            stream = api.events()
            try:
                snapshot = next(stream.events(), None)
                deadline = time.monotonic() + timeout
                clear_id = api.clear(scope)
                if clear_id is None:
                    raise client.ClientError("the service sent no Cache-Clear-Id header: "
                                             "--wait cannot follow this clear")
                return client.follow_clear(api, stream, clear_id, deadline, sys.stdout, sys.stdout.isatty(),
                                           names=client.names_from_snapshot(snapshot.data if snapshot else None),
                                           expect=args.expect, allow_empty=args.allow_empty)
            finally:
                stream.close()
        finally:
            api.close()

    def wait_timeout(self, args: argparse.Namespace) -> float:
        try:
            return self.settings(args).api.cache.wait_timeout
        except SettingsError as exc:
            raise UsageError(str(exc), 1) from None


class Workers(ClientCommand):
    name = "workers"
    help = ("show every worker process the service knows, grouped by name: state, last ack, cache entries and "
            "hit ratio")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--json", action="store_true", help="print the service's JSON as it is")

    def run(self, args: argparse.Namespace) -> int:
        api = self.api(args)
        try:
            if args.json:
                print(api.workers_body())
            else:
                print(client.worker_table(api.workers()))
        finally:
            api.close()
        return 0


COMMANDS: dict[str, Command | dict[str, Command]] = {
    "serve": Serve(),
    "worker": Worker(),
    "relay": RelayCommand(),
    "tokens": {"create": TokensCreate(), "list": TokensList(), "disable": TokensDisable()},
    "keys": {"create": KeysCreate()},
    "demo": Demo(),
    "clear": Clear(),
    "workers": Workers(),
}


def _add_command(subparsers: Any, command: Command) -> None:
    parser = subparsers.add_parser(command.name, help=command.help, description=command.help)
    parser.add_argument("--config", metavar="FILE",
                        help=f"settings file (default: ${settings_mod.CONFIG_ENV} or "
                             f"{settings_mod.DEFAULT_CONFIG_PATH})")
    parser.usage_status = command.usage_status
    command.add_arguments(parser)
    parser.set_defaults(command=command)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cachebus", description="Clear every process's cache at once, and prove it.")
    subparsers = parser.add_subparsers(metavar="COMMAND", required=True, parser_class=_Parser)
    for name, entry in COMMANDS.items():
        if isinstance(entry, Command):
            _add_command(subparsers, entry)
        else:
            group = subparsers.add_parser(name, help=f"manage {name}")
            nested = group.add_subparsers(metavar="ACTION", required=True, parser_class=_Parser)
            for command in entry.values():
                _add_command(nested, command)
    return parser


def main(argv: Sequence[str] | None = None, prog_command: str | None = None) -> int:
    """Console entry point. ``prog_command`` lets ``python -m cachebus.service`` mean ``serve``."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if prog_command is not None:
        args_list.insert(0, prog_command)
    try:
        args = build_parser().parse_args(args_list)
        command: Command = args.command  # set_defaults(command=…) in _add_command
        return command.run(args)
    except UsageError as exc:
        print(f"cachebus: error: {exc}", file=sys.stderr)
        return exc.status
    except SettingsError as exc:
        print(f"cachebus: error: {exc}", file=sys.stderr)
        return 2
    except client.ClientError as exc:
        print(f"cachebus: error: {exc}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as exc:
        # The base install (an application embedding the subscriber) has no service dependencies.
        if exc.name not in SERVICE_MODULES:
            raise
        print(f"cachebus: error: this command needs {exc.name}, which comes with the service extra: "
              "pip install 'cachebus[service]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
