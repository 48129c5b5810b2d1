"""Report: the one-page HTML report (``html``), its sections (``findings``) and figures
(``figures``)."""
