"""The inferlet SDK: the WIT contract (``wit/``) and the build tool for Python inferlets."""
