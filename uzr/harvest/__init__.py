"""Harvest: attention statistics of teacher and student, aligned to the student's tokens, into a store."""
