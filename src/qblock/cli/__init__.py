"""Command-line tools: ``qblock img``, ``qblock io``, ``qblock daemon``, ``qblock ctl``, ..."""
