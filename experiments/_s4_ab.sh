# session-4 A/B (temporary; removed before main)
mkdir -p $OUT/ab /root/w/ab
s() { echo "=== $1 at $SECONDS s"; }
[[ $1 == 1 ]] && { s bwd; BWD_VARIANTS=default,overlap,overlap2 timeout 120 python3 -m experiments.time_bwd_det 8192,32768 3 > $OUT/ab/bwd.txt 2>&1; grep -v "^ " $OUT/ab/bwd.txt | tail -6; }
[[ $1 == 1 ]] && { s fwd; timeout 170 python3 -m experiments.time_sm90_softmax 8192,32768,131072 2 order 8192,32768 > $OUT/ab/fwd.txt 2>&1; tail -9 $OUT/ab/fwd.txt | cut -c1-330; }
[[ $1 == 2 ]] && { s dec; VARIANTS=default,combine_v2,v2_pdl,v2_pdl_early ROUNDS=2 timeout 130 python3 -m experiments.time_decode_variants --out /root/w/ab/dec > $OUT/ab/dec.txt 2>&1; grep -E "^\|" $OUT/ab/dec.txt | cut -c1-200 | tail -12; }
[[ $1 == 2 ]] && { s mix; timeout 90 python3 -m experiments.time_train_mix_fused --lengths 8192,32768 --msrs 0.75 --rounds 3 --out /root/w/ab/mix > $OUT/ab/mix.txt 2>&1; tail -12 $OUT/ab/mix.txt | cut -c1-220; }
[[ $1 == 2 ]] && { s host; LENGTHS=8192 VARIANTS=dense,all_full,stream_router,stream_router_fused,block_router,block_router_fused PROFILE= ROUNDS=3 timeout 80 python3 -m experiments.profile_prefill_smollm2 > $OUT/ab/prefill.txt 2>&1; head -12 $OUT/ab/prefill.txt; grep -i "differ" $OUT/ab/prefill.txt; }
s end; cd /root/w && tar czf $OUT/ab_dirs.tar.gz ab
