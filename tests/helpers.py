"""Helpers shared by the decoding tests (imported as ``helpers``: pytest puts tests/ on sys.path)."""
from __future__ import annotations


def generate_with_session(view, decoder, prompt):
    """``decoder.generate(prompt)`` and the decoding session it used (captured from ``view.start``), so a test
    can inspect the caches the run left behind."""
    captured = {}
    original = view.start

    def spy(ids, n):
        session, first = original(ids, n)
        captured["session"] = session
        return session, first

    view.start = spy
    try:
        res = decoder.generate(prompt)
    finally:
        del view.start
    return res, captured["session"]
