"""The project's one error base. It lives in the lowest layer so that every package's errors can
derive from it; the `ctrstream` command (ctrstream/cli.py ``main``) prints any of them as
``ctrstream: <message>`` and exits with its ``exit_code``.

Exit codes of `ctrstream`:

==== =========================================================================================
code meaning
==== =========================================================================================
0    done
1    a service or store failed: Redis unreachable or failing, no feature store or model in
     it, a schema or layout mismatch, Kafka deliveries not acknowledged, the local stack not
     starting (`StoreUnavailable`, `MetaMissing`, `SchemaMismatch`, `LayoutMismatch`,
     `ModelStoreError`, `DeliveryError`, `StackError`; a doctor check failed)
2    bad input: the config (`ConfigError`), the arguments, a message (`BadEvent`), no
     archived examples for the date asked for (`NoArchive`), or a model reading count
     features the config does not count (`NotCounted`)
3    refused: a retrain worse than the online models (or, with ``--dry-run``, it would be);
     `stack status` with a component not running
4    conflict: another publisher moved the model pointer (`PublishConflict`,
     `RetrainConflict`)
130  interrupted (Ctrl-C)
==== =========================================================================================

A subclass keeps the builtin base it had (``class ConfigError(CtrstreamError, ValueError)``),
so ``except ValueError`` still catches it.
"""

from __future__ import annotations


class CtrstreamError(Exception):
    """Base of the project's errors; ``exit_code`` is what `ctrstream` exits with."""

    exit_code = 1
