"""The restore flow: a planner lists storage into a restore stream, and a group of writers
empties it into the target Redis, resumably."""
