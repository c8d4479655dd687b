"""Built-in components. Each module registers itself through the same `llamaforge_register` hook that a
third-party plugin implements; nothing here is special-cased by core."""
