"""The last parse of each token file, by its :class:`~.file.Signature`.

Every clear loads its token file twice (to authenticate, then to count the
call) and the same few tokens are loaded over and over, so an unchanged file
costs one ``stat`` instead of an open, a read and a YAML parse. A file known
not to parse is remembered too, so it is not read again until it changes.
"""

from __future__ import annotations

import threading
from pathlib import Path

from . import file
from .file import Signature, UnreadableFile
from .rules import Refusal, TokenData, TokenError


class ParseCache:
    """Parses by token, each with its file's signature; safe to use from several threads.

    Callers get copies: the counter adds to ``calls`` in the data it loaded.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Per token, the last parse of its file and that file's signature; None
        # for a file known not to parse.
        self._parsed: dict[str, tuple[Signature, TokenData | None]] = {}

    def load(self, token: str, path: Path, *, lock: bool = True) -> tuple[TokenData, Signature]:
        """The token file parsed, and its signature; parsed again only if it changed. Blocking.

        Read under the shared file lock if ``lock``: False when the caller holds
        the exclusive one, which a shared lock would wait for.
        """
        signature = file.signature(path)
        data = self.cached(token, signature)
        if data is not None:
            return data, signature
        try:
            data, signature = file.read(path, lock=lock)
        except UnreadableFile as exc:
            if not exc.empty:  # an empty read may be a torn write of a file with that very signature
                with self._lock:
                    self._parsed[token] = (exc.signature, None)
            raise
        with self._lock:
            self._parsed[token] = (signature, dict(data))
        return data, signature

    def cached(self, token: str, signature: Signature) -> TokenData | None:
        """A copy of the token file's last parse if the file still has ``signature``, else None.

        Raises the invalid-file refusal if the file with that signature did not parse.
        """
        with self._lock:
            cached = self._parsed.get(token)
            if cached is None or cached[0] != signature:
                return None
            if cached[1] is None:
                raise TokenError(Refusal.INVALID_TOKEN_FILE)
            return dict(cached[1])

    def wrote(self, token: str, data: TokenData, signature: Signature) -> None:
        """Our own write of ``data``, about to land with ``signature``: never parsed again."""
        with self._lock:
            self._parsed[token] = (signature, dict(data))
