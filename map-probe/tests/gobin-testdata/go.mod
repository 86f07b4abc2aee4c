module gobintest

go 1.19
