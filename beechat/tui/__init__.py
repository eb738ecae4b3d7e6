"""The Textual front end: `beechat.tui.app.create_app` builds it, `run_tui` runs it."""
