"""Allure results, summaries and rendered reports."""
