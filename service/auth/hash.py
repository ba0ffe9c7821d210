"""PHP's ``password_hash`` and ``password_verify`` for bcrypt, as Flextype uses them.

Flextype token files hold ``hashed_access_token`` as PHP writes it, so a
token directory copied from a Flextype project verifies here, and one made by
``cachebus tokens create`` verifies in Flextype. Kept apart from
:mod:`.rules` because bcrypt is the service's dependency only.
"""

from __future__ import annotations

import bcrypt

#: bcrypt (and PHP's ``password_verify``) only look at the first 72 bytes.
BCRYPT_MAX_BYTES = 72
#: The cost of new hashes, as in Flextype's own (``$2y$10$``).
BCRYPT_ROUNDS = 10


def password_verify(access_token: str, hashed: str) -> bool:
    """Step 6, second half: PHP's ``password_verify`` for bcrypt. Slow by design.

    PHP ignores bytes past the 72nd, where the bcrypt module raises, so they are
    cut here. A malformed hash verifies nothing rather than raising.
    """
    # surrogatepass: a lone surrogate (possible from a JSON body) must fail to
    # verify, not crash the request.
    secret = access_token.encode("utf-8", "surrogatepass")[:BCRYPT_MAX_BYTES]
    try:
        return bcrypt.checkpw(secret, hashed.encode("utf-8", "surrogatepass"))
    except ValueError:
        return False


def password_hash(access_token: str) -> str:
    """A new hash of ``access_token`` as PHP's ``password_hash`` writes it: ``$2y$``.

    ``$2y$`` and the bcrypt module's ``$2b$`` name the same algorithm, and
    both libraries verify either; the file says what Flextype would write.
    """
    hashed = bcrypt.hashpw(access_token.encode(), bcrypt.gensalt(rounds=BCRYPT_ROUNDS)).decode("ascii")
    return "$2y$" + hashed.removeprefix("$2b$")
