"""Self-contained static HTML report of a dissected model (``qkdissect report``).

Output folder (everything local; open ``index.html`` from disk, no server, no network request)::

    index.html                        overview: model card, provenance, layer × head heat map of the
                                      weighted cosine C_h (click a cell: its head page), layer figures,
                                      layer summary table
    heads/layer{L}_head{H}.html       one page per head: statistics, inline SVG charts of the spectrum and
                                      of the per-mode cosines against the null, table of modes; top images
                                      of the leading modes (--mined) and per-image maps (--maps) as <img
                                      loading="lazy"> files under img/
    compare.html                      with --compare: several models by relative depth
    preference.html                   with --preference: same / different / background attention by depth
    img/*.png                         figures (matplotlib): layer_similarity, mode_cosines, compare*, preference*
    img/mined/L<ll>/H<hh>/m<kkk>_<pos|neg>_<rank>.jpg   top-image tiles with query/key overlays (--mined)
    img/maps/<nn>/<item>_<mode|strip>.png              figures copied from maps folders (--maps)
    report.json                       manifest: {"format": "qkdissect-report", "format_version", "model",
                                      "n_layers", "n_heads", "sections", "inputs", "pages", "n_files",
                                      "bytes", "warnings", "build_seconds", "created", "versions",
                                      "files": every other file of the report}; read with
                                      :func:`load_report`

Each page inlines its CSS and JS (one small hand-written stylesheet and script from ``static/``) and
carries a Content-Security-Policy that blocks network access and any script but the report's own
(by hash). All text from user data (model ids, file names, labels) passes through Jinja2's autoescape.
The report is written into the staging folder ``.qkdissect-tmp/`` and moved into place at the end, so a
failure never leaves half a report; an existing folder is used only if it is a previous report, and then only
the files its report.json lists are replaced or removed (:mod:`qkdissect.outputs`).
"""

from qkdissect.report.assets import head_page_name
from qkdissect.report.build import FORMAT_VERSION, ReportResult, build_report, load_report

__all__ = ["FORMAT_VERSION", "ReportResult", "build_report", "head_page_name", "load_report"]
