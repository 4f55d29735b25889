"""Driving the lab from an AI agent: the config schema it reads and the Model Context Protocol server."""
