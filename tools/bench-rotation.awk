#!/usr/bin/awk -f
# Prints the rotation rows of `make bench` from the TestHARotation* logs, with PostgreSQL/Badger.
/due chains rotated by/ {
	match($0, /rotated by [0-9]+ replicas in [0-9.]+(ms|s|m[0-9.]+s)/)
	split(substr($0, RSTART, RLENGTH), f, " ")
	d = f[6]; secs = d + 0
	if (d ~ /ms$/) secs = secs / 1000
	else if (d ~ /m[0-9.]+s$/) { split(d, ms, "m"); secs = ms[1] * 60 + ms[2] }
	if (f[3] == 1) badger = secs; else pg = secs
	print
}
/^(--- FAIL|FAIL|ok )/ { print }
END {
	if (badger > 0 && pg > 0) printf "| rotate 1,000 due chains (s) | Badger %.2f | PostgreSQL %.2f | PG/Badger %.2f |\n", badger, pg, pg / badger
	else { print "rotation rows missing"; exit 1 }
}
