if ok then
  if cost > 0 then
