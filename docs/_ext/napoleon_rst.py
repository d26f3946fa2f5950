"""An autodoc2 docstring parser: Google-style sections (``Attributes:``, ``Args:``) via napoleon, then reST.

dcplan's docstrings are reST field lists (``:param x:``, ``:returns:``) with a few
Google-style ``Attributes:`` sections (``dcplan.Config``); napoleon turns the
latter into ``:ivar:`` fields and leaves the former alone.
"""

from __future__ import annotations

from typing import Any

from docutils.parsers.rst import Parser as RstParser
from sphinx.ext.napoleon import Config as NapoleonConfig
from sphinx.ext.napoleon.docstring import GoogleDocstring

_CONFIG = NapoleonConfig(napoleon_use_ivar=True, napoleon_use_param=True, napoleon_use_rtype=False)


class NapoleonRstParser(RstParser):
    """Parse a docstring as reST after napoleon's Google-style conversion."""

    def parse(self, inputstring: str, document: Any) -> None:
        super().parse(str(GoogleDocstring(inputstring, _CONFIG)), document)


Parser = NapoleonRstParser
