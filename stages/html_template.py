"""`dvc plots show` offline: an HTML page template with Vega, Vega-Lite and Vega-Embed inlined.

DVC's default page loads those scripts from a CDN, so its figures stay blank without a network. This
writes a page with the same `{plot_divs}` placeholder and the scripts bundled by vl-convert (the Vega
project's own converter), for `dvc plots show --html-template <file>` (see `make plots`).
"""

from __future__ import annotations

from pathlib import Path

import typer

from rcekd.io import atomic_path
from stages.common import log

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>rcekd figures</title>
<script>{bundle}</script>
<style>body {{ font-family: sans-serif; }} table {{ border-spacing: 15px; }}</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def main(out: Path = typer.Option(..., help="Output HTML template (give it to `dvc plots show --html-template`).")) -> None:
    """Write an offline page template for `dvc plots show` / `dvc plots diff`."""
    import vl_convert

    bundle = vl_convert.javascript_bundle()
    with atomic_path(out) as tmp:
        tmp.write_text(PAGE.format(bundle=bundle.replace("</script", "<\\/script")))
    log(f"{out}: offline plots template (Vega {vl_convert.get_vega_version()}, Vega-Embed {vl_convert.get_vega_embed_version()})")
