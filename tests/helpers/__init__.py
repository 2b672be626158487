"""Helpers shared by the test modules (no tests here): fakes, tiny models and artifacts,
the redis-server fixture, and the builders several test modules use."""
