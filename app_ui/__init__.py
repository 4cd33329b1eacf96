"""Streamlit helpers shared by the app's pages: cached data and models, shared state, charts.

Kept out of `app_pages/` (where every file is a page) and out of `cascade_core` (no Streamlit there).
"""
