# Chart of loadtest/results/cache-hits.dat (figures from cache_compare.sh,
# copied by hand into the .dat): gnuplot loadtest/cache_chart.gp
set terminal pngcairo size 1400,600 font ',10' noenhanced
set output 'loadtest/results/cache-hits.png'
set multiplot layout 1,2 title 'cache hits: yatagarasu vs nginx proxy_cache vs Varnish (1 worker each, pinned, wrk -c32)'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set key outside bottom center horizontal
set logscale y
set grid ytics
set title 'requests/s (log scale, higher is better)'
plot for [i=2:5] 'loadtest/results/cache-hits.dat' using i:xtic(1) title columnheader(i)
set title 'CPU us per request (log scale, lower is better)'
plot for [i=6:9] 'loadtest/results/cache-hits.dat' using i:xtic(1) title columnheader(i)
unset multiplot
