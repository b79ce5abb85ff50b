# Reads trial's output and prints its closing summary, such as
#     FAILED (skips=1, failures=2, errors=1, successes=9)
# as the line CI counts:
#     9 passed, 3 failed, 1 skipped
# Errors and unexpected successes count as failures; expected failures count
# as neither passed nor failed.  Without a summary (trial never ran, or
# died) it prints "0 passed, 1 failed" and exits 1.

# The last one wins: a test's own output could hold an earlier lookalike.
/^(PASSED|FAILED)( \([a-zA-Z]+=[0-9]+(, [a-zA-Z]+=[0-9]+)*\))?$/ { summary = $0 }

END {
    if (summary == "") {
        print "0 passed, 1 failed"
        exit 1
    }
    # "FAILED (skips=1, failures=2)" splits into FAILED, skips, 1, failures,
    # 2 and an empty last field.
    n = split(summary, fields, /[ (),=]+/)
    for (i = 2; i < n; i += 2)
        count[fields[i]] = fields[i + 1]
    printf "%d passed, %d failed, %d skipped\n", count["successes"],
        count["failures"] + count["errors"] + count["unexpectedSuccesses"],
        count["skips"]
}
