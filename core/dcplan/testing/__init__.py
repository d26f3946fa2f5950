"""Test helpers shipped with dcplan (the plugin authors' kit lives here too)."""
