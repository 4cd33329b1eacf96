"""Streamlit helpers shared by the app's pages: cached data (`data`), loaded backends (`backends`), shared state,
charts.

Kept out of `pages/` (where every file is a page) and out of `cascade_core` (no Streamlit there).
"""
