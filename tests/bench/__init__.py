"""`make bench`: load tests of real `knocker serve` processes (not collected by pytest)."""
