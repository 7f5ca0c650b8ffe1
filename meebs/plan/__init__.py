"""What a recipe will do before it runs: the step math, the file names and the `ss_*`
metadata each file carries, exact file sizes and the memory estimate, and the tables
`plan` prints.
"""
