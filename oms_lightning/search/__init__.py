"""Schedule search: the search spaces (random schedules, encoding) and, later, evolution and its callback."""
