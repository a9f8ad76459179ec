"""Tests of the TDSV recipe."""
