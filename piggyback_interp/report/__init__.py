"""Report: the one-page HTML report (``html``), its sections (``sections``), the sections
of a demo or scan run (``findings``) and figures (``figures``)."""
