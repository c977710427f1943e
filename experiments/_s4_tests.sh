# session-4 GPU tests (temporary; removed before main)
timeout 400 python3 -m pytest -q -rf -p no:cacheprovider -m gpu tests > $OUT/gputests.log 2>&1; echo "pytest rc=$?"; grep -E "^FAILED|passed|failed" $OUT/gputests.log | tail -15
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/gpu_sanitize.py --no-timing > $OUT/memcheck.log 2>&1; echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|error" $OUT/memcheck.log | tail -5
